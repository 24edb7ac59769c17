! The one-scale Lorenz-96 model of the mecs benchmark, in Fortran: the host model.
!
!   dX_k/dt = X_{k-1} (X_{k+1} - X_{k-2}) - X_k + F,  k = 1..K, periodic,
!
! stepped with the classical fourth-order Runge-Kutta scheme, for many members at
! once: x(K, members), one column per member (the service's [member][k] layout).
! The same formula and scheme as the torch host `l96` and the reference process
! host of mecs (correction/hosts/lorenz96.py, correction/reference_host.py).
module l96_model
  use, intrinsic :: iso_fortran_env, only: real64
  implicit none
  private
  public :: l96_tendency, l96_rk4

contains

  pure subroutine l96_tendency(x, forcing, dxdt)
    real(real64), intent(in) :: x(:, :), forcing
    real(real64), intent(out) :: dxdt(:, :)
    integer :: k, n, km1, km2, kp1
    n = size(x, 1)
    do k = 1, n
       km1 = modulo(k - 2, n) + 1
       km2 = modulo(k - 3, n) + 1
       kp1 = modulo(k, n) + 1
       dxdt(k, :) = x(km1, :) * (x(kp1, :) - x(km2, :)) - x(k, :) + forcing
    end do
  end subroutine l96_tendency

  !> One RK4 step of length dt, in place.
  subroutine l96_rk4(x, forcing, dt)
    real(real64), intent(inout) :: x(:, :)
    real(real64), intent(in) :: forcing, dt
    real(real64), dimension(size(x, 1), size(x, 2)) :: k1, k2, k3, k4
    call l96_tendency(x, forcing, k1)
    call l96_tendency(x + 0.5_real64 * dt * k1, forcing, k2)
    call l96_tendency(x + 0.5_real64 * dt * k2, forcing, k3)
    call l96_tendency(x + dt * k3, forcing, k4)
    x = x + (dt / 6.0_real64) * (k1 + 2.0_real64 * (k2 + k3) + k4)
  end subroutine l96_rk4

end module l96_model
