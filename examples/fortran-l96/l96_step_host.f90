! The Fortran Lorenz-96 host as a mecs-step/1 process, for `--host process:...`.
!
!   mecs finetune --mode hybrid --host "process:build/examples/fortran-l96/l96_step_host"
!
! mecs starts this program once and keeps it: the program says hello on standard
! output, then answers every step request (a JSON line, then the states' raw
! little-endian bytes) with the states advanced by `steps` RK4 steps of the model
! in l96_model.f90, and exits on {"op": "close"} or when its input ends. The
! protocol is written down in correction/stepproto.py. Standard error is the log.
!
! Arguments (name=value): K (36), F (10), dt (0.01), name (fortran-l96).
program l96_step_host
  use, intrinsic :: iso_fortran_env, only: real32, real64, int8, error_unit
  use, intrinsic :: iso_c_binding
  use l96_model, only: l96_rk4
  implicit none

  interface
     function c_read(fd, buf, n) bind(C, name="read") result(got)
       import :: c_int, c_ptr, c_size_t, c_intptr_t
       integer(c_int), value :: fd
       type(c_ptr), value :: buf
       integer(c_size_t), value :: n
       integer(c_intptr_t) :: got
     end function c_read
     function c_write(fd, buf, n) bind(C, name="write") result(put)
       import :: c_int, c_ptr, c_size_t, c_intptr_t
       integer(c_int), value :: fd
       type(c_ptr), value :: buf
       integer(c_size_t), value :: n
       integer(c_intptr_t) :: put
     end function c_write
  end interface

  integer, parameter :: MAX_LINE = 65536
  character(kind=c_char), target :: inbuf(MAX_LINE)
  integer :: in_pos = 1, in_len = 0
  character(len=MAX_LINE) :: line
  character(len=512) :: arg, name = "fortran-l96", answer
  character(len=64) :: id_text, datatype, op
  integer :: K = 36, i, n, nline, steps, batch, width, ios, shape(8), rank
  real(real64) :: forcing = 10.0_real64, dt = 0.01_real64
  real(real64), allocatable, target :: x(:, :)
  real(real32), allocatable, target :: x4(:, :)
  logical :: ok

  if (transfer(1_c_int, 0_int8) /= 1_int8) then
     write(error_unit, '(a)') "l96_step_host: mecs-step/1 is little-endian; this machine is not"
     error stop 2
  end if
  do i = 1, command_argument_count()
     call get_command_argument(i, arg)
     n = index(arg, "=")
     ios = 0
     select case (arg(:max(n - 1, 0)))
     case ("K"); read(arg(n + 1:), *, iostat=ios) K
     case ("F"); read(arg(n + 1:), *, iostat=ios) forcing
     case ("dt"); read(arg(n + 1:), *, iostat=ios) dt
     case ("name")
        name = arg(n + 1:)
        if (len_trim(name) > 200 .or. scan(trim(name), '"\') > 0) then
           write(error_unit, '(a)') "l96_step_host: name= takes up to 200 characters, no quotes"
           error stop 2
        end if
     case default
        write(error_unit, '(a)') "l96_step_host: unknown argument '" // trim(arg) // &
             "' (K=, F=, dt=, name=)"
        error stop 2
     end select
     if (ios /= 0) then
        write(error_unit, '(a)') "l96_step_host: bad value in '" // trim(arg) // "'"
        error stop 2
     end if
  end do

  write(answer, '(a,i0,a,es24.16e3,a)') '{"protocol":"mecs-step/1","name":"' // trim(name) // &
       '","state_shape":[', K, '],"dtype":"FP64","dt":', dt, ',"time_unit":"model time unit"}'
  call put_line(answer)
  do
     call get_line(line, nline, ok)
     if (.not. ok) exit  ! mecs went away
     call json_raw(line(:nline), "op", op)
     if (op == '"close"') exit
     if (op /= '"step"') then
        write(error_unit, '(a)') "l96_step_host: unknown request: " // line(:min(nline, 200))
        error stop 3
     end if
     call json_raw(line(:nline), "id", id_text)
     if (len_trim(id_text) == 0) id_text = "null"
     call json_raw(line(:nline), "datatype", datatype)
     call json_ints(line(:nline), "shape", shape, rank)
     call json_int(line(:nline), "steps", steps, 1)
     if (rank /= 2 .or. (datatype /= '"FP64"' .and. datatype /= '"FP32"')) then
        write(error_unit, '(a)') "l96_step_host: a request without a [batch, K] FP32/FP64 state: " &
             // line(:min(nline, 200))
        error stop 3
     end if
     batch = shape(1)
     width = merge(8, 4, datatype == '"FP64"')
     if (allocated(x)) then
        if (size(x, 2) /= batch .or. size(x, 1) /= shape(2)) deallocate(x, x4)
     end if
     if (.not. allocated(x)) allocate(x(shape(2), batch), x4(shape(2), batch))
     if (datatype == '"FP64"') then
        call get_bytes(c_loc(x), int(size(x), c_size_t) * 8, ok)
     else
        call get_bytes(c_loc(x4), int(size(x4), c_size_t) * 4, ok)
        x = real(x4, real64)
     end if
     if (.not. ok) exit
     if (shape(2) /= K) then  ! answered, not fatal: mecs names the step
        write(answer, '(a,i0,a,i0,a)') '{"id":' // trim(id_text) // &
             ',"error":"this host has K = ', K, ', the request ', shape(2), '"}'
        call put_line(answer)
        cycle
     end if
     do i = 1, steps
        call l96_rk4(x, forcing, dt)
     end do
     write(answer, '(a,i0,a,i0,a)') '{"id":' // trim(id_text) // ',"shape":[', batch, ',', &
          K, '],"datatype":' // trim(datatype) // '}'
     call put_line(answer)
     if (width == 8) then
        call put_bytes(c_loc(x), int(size(x), c_size_t) * 8)
     else
        x4 = real(x, real32)
        call put_bytes(c_loc(x4), int(size(x4), c_size_t) * 4)
     end if
  end do

contains

  !> Refill the input buffer from standard input; false at its end.
  logical function refill()
    integer(c_intptr_t) :: got
    got = c_read(0_c_int, c_loc(inbuf), int(MAX_LINE, c_size_t))
    in_len = int(max(got, 0_c_intptr_t))
    in_pos = 1
    refill = got > 0
  end function refill

  subroutine get_line(text, n, ok)
    character(len=*), intent(out) :: text
    integer, intent(out) :: n
    logical, intent(out) :: ok
    n = 0
    ok = .false.
    do
       if (in_pos > in_len) then
          if (.not. refill()) return
       end if
       if (inbuf(in_pos) == c_new_line) then
          in_pos = in_pos + 1
          ok = .true.
          return
       end if
       if (n < len(text)) then
          n = n + 1
          text(n:n) = inbuf(in_pos)
       end if
       in_pos = in_pos + 1
    end do
  end subroutine get_line

  !> nbytes from standard input into `dest`: what is buffered first, then directly.
  subroutine get_bytes(dest, nbytes, ok)
    type(c_ptr), intent(in) :: dest
    integer(c_size_t), intent(in) :: nbytes
    logical, intent(out) :: ok
    character(kind=c_char), pointer :: out(:)
    integer(c_size_t) :: done, take
    integer(c_intptr_t) :: got
    call c_f_pointer(dest, out, [nbytes])
    done = 0
    take = min(int(in_len - in_pos + 1, c_size_t), nbytes)
    if (take > 0) then
       out(1:take) = inbuf(in_pos:in_pos + int(take) - 1)
       in_pos = in_pos + int(take)
       done = take
    end if
    do while (done < nbytes)
       got = c_read(0_c_int, c_loc(out(done + 1)), nbytes - done)
       if (got <= 0) then
          ok = .false.
          return
       end if
       done = done + int(got, c_size_t)
    end do
    ok = .true.
  end subroutine get_bytes

  subroutine put_bytes(src, nbytes)
    type(c_ptr), intent(in) :: src
    integer(c_size_t), intent(in) :: nbytes
    character(kind=c_char), pointer :: bytes(:)
    integer(c_size_t) :: done
    integer(c_intptr_t) :: put
    call c_f_pointer(src, bytes, [nbytes])
    done = 0
    do while (done < nbytes)
       put = c_write(1_c_int, c_loc(bytes(done + 1)), nbytes - done)
       if (put <= 0) error stop 4  ! mecs closed the pipe
       done = done + int(put, c_size_t)
    end do
  end subroutine put_bytes

  subroutine put_line(text)
    character(len=*), intent(in) :: text
    character(kind=c_char, len=len_trim(text) + 1), target :: buf
    buf = trim(text) // c_new_line
    call put_bytes(c_loc(buf), int(len(buf), c_size_t))
  end subroutine put_line

  !> The raw text of a member's value ("7", "\"FP64\"", "[4,36]"), or "" when absent.
  subroutine json_raw(text, key, value)
    character(len=*), intent(in) :: text, key
    character(len=*), intent(out) :: value
    integer :: at, j, depth
    logical :: in_string
    value = ""
    at = index(text, '"' // key // '"')
    if (at == 0) return
    j = at + len(key) + 2
    do while (j <= len(text))
       if (text(j:j) /= ' ' .and. text(j:j) /= ':') exit
       j = j + 1
    end do
    at = j
    depth = 0
    in_string = .false.
    do while (j <= len(text))
       if (in_string) then
          if (text(j:j) == '\') then
             j = j + 1
          else if (text(j:j) == '"') then
             in_string = .false.
             if (depth == 0) exit
          end if
       else if (text(j:j) == '"') then
          in_string = .true.
       else if (text(j:j) == '[' .or. text(j:j) == '{') then
          depth = depth + 1
       else if (text(j:j) == ']' .or. text(j:j) == '}') then
          if (depth == 0) then
             j = j - 1
             exit
          end if
          depth = depth - 1
          if (depth == 0) exit
       else if (text(j:j) == ',' .and. depth == 0) then
          j = j - 1
          exit
       end if
       j = j + 1
    end do
    value = text(at:min(j, len(text)))
  end subroutine json_raw

  subroutine json_int(text, key, value, default)
    character(len=*), intent(in) :: text, key
    integer, intent(out) :: value
    integer, intent(in) :: default
    character(len=64) :: raw
    integer :: io
    call json_raw(text, key, raw)
    value = default
    if (len_trim(raw) > 0) read(raw, *, iostat=io) value
  end subroutine json_int

  subroutine json_ints(text, key, values, n)
    character(len=*), intent(in) :: text, key
    integer, intent(out) :: values(:), n
    character(len=256) :: raw
    integer :: io, j, commas
    call json_raw(text, key, raw)
    n = 0
    values = 0
    if (len_trim(raw) < 3) return
    commas = 0
    do j = 1, len_trim(raw)
       if (raw(j:j) == ',') commas = commas + 1
    end do
    n = min(commas + 1, size(values))
    raw(1:1) = ' '
    raw(len_trim(raw):len_trim(raw)) = ' '
    read(raw, *, iostat=io) values(1:n)
    if (io /= 0) n = 0
  end subroutine json_ints

end program l96_step_host
